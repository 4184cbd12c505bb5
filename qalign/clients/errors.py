"""Errors raised by the generator and reward clients."""

from __future__ import annotations

from qalign.clients.redact import redact_known


class ClientError(Exception):
    """Base class for every client failure.

    Its message never holds an API key of this process: servers may echo the request's
    `Authorization` header in their error bodies, and these messages are stored, printed and
    logged. Text arguments are masked when the error is made (see `qalign.clients.redact`).
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_known(a) if isinstance(a, str) else a for a in args))


class ServerUnavailableError(ClientError):
    """No endpoint answered (connection refused, timeouts, 5xx) after every retry."""


class RetryableStatusError(ClientError):
    """A transient HTTP status (429/500/502/503/504): the request may be sent again."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.url = url
        self.status = status
        self.message = redact_known(message)


class ServerRequestError(ClientError):
    """The server refused the request (400/404/422/501...): retrying would not help.

    The server's own message is part of the exception text.
    """

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url} rejected the request (HTTP {status}): {message}")
        self.url = url
        self.status = status
        self.message = redact_known(message)


class ProtocolError(ClientError):
    """The server answered, but not in the shape this client speaks (missing or wrong fields)."""


class ModelNotServedError(ClientError):
    """The configured model name is not among the names the server serves."""


class PromptTooLongError(ClientError):
    """A templated prompt is longer than `max_prompt_length`; we never cut prompts silently."""


class CredentialsError(ClientError):
    """The API key a config points at (`api_key_env` / `api_key_file`) cannot be read."""
