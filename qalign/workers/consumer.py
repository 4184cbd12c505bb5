"""The worker's broker consumer: Celery's, made to survive a broker restart.

Selected with the `worker_consumer` setting (see `qalign.workers.app`), so only worker processes
import it.

When Redis goes away, Celery's consumer `collect()`s the broken connection, which detaches
kombu's transport from it (`transport.client = None`), then `close()`s it and reconnects. A
kombu Redis channel of the discarded connection that later needs a Redis client builds a new
pool from `transport.client` and fails with `AttributeError: 'NoneType' object has no attribute
'hostname'` (`Channel._connparams`, cf. celery/kombu#582) instead of a connection error. Celery
only tolerates connection errors on these paths, so the AttributeError stopped the worker
("Unrecoverable error"). Two paths reach it:

* discarding the connection: when the loss is first seen on another socket (the remote-control
  pub/sub one) while the task channel's BRPOP is outstanding, `collect()`'s close of that
  channel stops at the failed BRPOP read and leaves it open; `close()` closes it again, and
  requeueing its unacked messages needs a new pool;
* acknowledging, after the reconnect, a task that was received on the old channel (late acks:
  the tasks in flight during the outage finish afterwards).

Both are about a connection that is gone, so they are handled as a lost connection is: logged,
and the worker carries on. Nothing is lost by it: an unacked message stays in Redis's `unacked`
hash and kombu redelivers it after the visibility timeout, and when Redis itself lost it (a
restart without persistence) `qalign sweep reap` re-enqueues the chain.

It also keeps a *poison message* (one no worker can run) from stopping the worker. Celery parses
a task message in the consumer itself, and only some of its failures are handled there: a body
that kombu cannot decode from its `body_encoding` (invalid base64) raised while kombu built the
message, and a JSON body of the wrong shape (an object, a list of the wrong length) raised in
Celery's request parser. Either stopped the worker ("Unrecoverable error"), and the second went
back to the queue to stop every worker that took it after. Now every message that fails
before its task runs is logged with one line (`dropped message <id> ...: <why>`), acknowledged
and dropped; a message's hint is never needed for correctness (the database is the source of
truth, and the reaper re-enqueues a chain whose hint was lost).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.transport.virtual import Message as VirtualMessage

from qalign.workers.messages import body_problem, drop_line

log = logging.getLogger(__name__)


def _connection_gone(channel: Any) -> bool:
    """Whether a kombu virtual channel belongs to a connection that was closed or collected."""
    transport = getattr(channel, "connection", None)  # None once the channel is closed
    return transport is None or getattr(transport, "client", None) is None


class BrokerRestartSafeConsumer(Consumer):  # type: ignore[misc]  # celery is untyped
    """Celery's consumer, except that neither a channel of a lost connection nor a message it
    cannot run can stop the worker."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as err:
            # Celery clears `self.connection` just before closing the old connection: if it is
            # still set, the AttributeError came from elsewhere and is a bug to surface.
            if self.connection is not None:
                raise
            log.warning(
                "consumer: ignored %r while discarding the lost broker connection; reconnecting",
                err,
            )

    def call_soon_ack(self, p: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # `p` is `message.ack_log_error` or `message.reject_log_error`, which only tolerate
        # connection errors.
        return super().call_soon_ack(_unless_connection_gone(p), *args, **kwargs)

    # -- poison messages ----------------------------------------------------------------------

    def loop_args(self) -> tuple[Any, ...]:
        # Called as the event loop starts, after the Tasks step made the task consumer (again
        # after every reconnect, on the new channel) and before it consumes anything.
        channel = getattr(self.task_consumer, "channel", None)
        if channel is not None and getattr(channel, "Message", None) is VirtualMessage:
            channel.Message = _DecodeTolerantMessage
        args: tuple[Any, ...] = super().loop_args()
        return args

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle: Callable[[Any], Any] = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            headers = message.headers
            if isinstance(headers, Mapping) and "task" in headers:
                # Protocol 2: Celery's request parser unpacks the body as [args, kwargs, embed]
                # in this thread, so check its shape first. The decoded body is cached on the
                # message: Celery does not decode it again.
                try:
                    body = message.payload
                except ContentDisallowed as exc:  # e.g. pickle: never deserialized
                    return self.on_invalid_task(None, message, exc)
                except Exception as exc:  # kombu's DecodeError, or a codec's own error
                    return self.on_decode_error(message, exc)
                problem = body_problem(body)
                if problem is not None:
                    return self._drop(message, problem)
            try:
                return handle(message)
            except self.connection_errors:
                raise  # Celery reconnects; the message stays unacknowledged in the broker
            except Exception as exc:  # anything else this message made fail before its task ran
                return self._drop(message, f"{type(exc).__name__}: {exc}", exc)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        # Celery's version logs the whole message and a traceback at CRITICAL for each one.
        if message.errors:  # kombu could not even undo the transport's body_encoding
            encoding = (message.properties or {}).get("body_encoding")
            how = f"from its body_encoding {encoding!r}"
        else:
            how = f"as {message.content_type or 'its content type'}"
        self._drop(message, f"its body cannot be decoded {how} ({type(exc).__name__}: {exc})", exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._drop(message, f"invalid task message ({type(exc).__name__}: {exc})", exc)

    def _drop(self, message: Any, reason: str, exc: Exception | None = None) -> None:
        """Log one line for a message that cannot run, acknowledge it, and go on."""
        headers = message.headers if isinstance(message.headers, Mapping) else {}
        log.error(
            "%s",
            drop_line(
                headers.get("id", "(no id)"),
                headers.get("task", "(none)"),
                reason,
                f"delivery tag {message.delivery_tag}, body {_excerpt(message)}",
            ),
        )
        if not message.acknowledged:
            # Acknowledged, not requeued: it would fail the same way on every worker.
            _unless_connection_gone(message.ack_log_error)(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


def _excerpt(message: Any, limit: int = 60) -> str:
    """The start of a message's body as received, for the log line."""
    body = message.body
    if body is None:  # not decodable from its body_encoding: show the raw text
        raw = getattr(message, "_raw", None)
        body = raw.get("body") if isinstance(raw, Mapping) else None
    if body is None:
        return "(none)"
    size = len(body) if isinstance(body, bytes | str) else 0
    text = repr(body[:limit] if isinstance(body, bytes | str) else body)
    return f"{text[: limit + 10]} ({size} bytes)"


class _DecodeTolerantMessage(VirtualMessage):
    """kombu's virtual-transport message, except that a body its channel cannot decode from its
    `body_encoding` (invalid base64, an unknown encoding) does not raise out of the transport's
    read loop (which stops the worker). The message is built without a body and carries the
    error, which kombu hands to the consumer's `on_decode_error` (as it does for a failed
    decompression), where it is logged, acknowledged and dropped.
    """

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)  # type: ignore[no-untyped-call]
            return
        except Exception:
            properties = payload.get("properties") if isinstance(payload, Mapping) else None
            if not isinstance(properties, Mapping) or "delivery_tag" not in properties:
                raise  # not a message envelope: there is nothing to acknowledge
            self.errors = [sys.exc_info()]  # kept by kombu's Message.__init__
        stripped = {**payload, "body": None}
        super().__init__(stripped, channel=channel, **kwargs)  # type: ignore[no-untyped-call]
        self._raw = payload  # what kombu keeps in its unacked hash until the ack


def _unless_connection_gone(settle: Callable[..., Any]) -> Callable[..., Any]:
    message = getattr(settle, "__self__", None)
    channel = getattr(message, "channel", None)
    if channel is None:
        return settle

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return settle(*args, **kwargs)
        except AttributeError as err:
            if not _connection_gone(channel):
                raise
            log.warning(
                "could not settle message %s: it was received on a broker connection that has "
                "since been lost (%r); the broker redelivers it if it still has it",
                getattr(message, "delivery_tag", "?"),
                err,
            )
            return None

    return run
