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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)


def _connection_gone(channel: Any) -> bool:
    """Whether a kombu virtual channel belongs to a connection that was closed or collected."""
    transport = getattr(channel, "connection", None)  # None once the channel is closed
    return transport is None or getattr(transport, "client", None) is None


class BrokerRestartSafeConsumer(Consumer):  # type: ignore[misc]  # celery is untyped
    """Celery's consumer, except that a channel of a lost connection cannot stop the worker."""

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
