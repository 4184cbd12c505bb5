"""Masking API keys in the text the clients produce: exception messages and log lines.

A server, proxy or gateway may echo a request's `Authorization` header (or the key alone) in its
error body, and that body becomes part of an exception message that qalign stores
(`step_errors`, `chains.last_error`), prints (`sweep status`), exports and logs. So the client
layer masks its keys where that text is made:

* `HttpSettings` registers its `api_key` here when it is created (`register_secret`);
* every `ClientError`'s message is masked against the registered keys when it is built, and so
  is the server text the HTTP layer puts in messages and log lines (`error_message`, malformed
  bodies), before it is cut to length;
* `redact(text, secrets)` is the pure function under both.

An occurrence is replaced by `***`, so `Authorization: Bearer <key>` reads `Bearer ***`. The key
is also found JSON-escaped, URL-encoded and as Python's repr shows it, and as a fragment of at
least `FRAGMENT_CHARS` characters at the start or end of a key (an excerpt cut mid-key).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "***"
#: A shorter run of a key's first (or last) characters is not masked on its own.
FRAGMENT_CHARS = 8

_lock = threading.Lock()
_known: tuple[str, ...] = ()  # registered keys' forms; replaced whole, never mutated


def _forms(secret: str) -> set[str]:
    """How `secret` can appear in text: as sent, JSON-escaped, URL-encoded, inside a repr."""
    key = secret.strip()  # what is sent (api_key() strips the file or variable)
    found = {secret, key, json.dumps(key)[1:-1], quote(key, safe=""), quote_plus(key)}
    found.add(repr(key)[1:-1])
    return {f for f in found if f.strip()}


def _spans(text: str, form: str) -> Iterable[tuple[int, int]]:
    """Spans of `text` that are a run of `form` from its start of at least FRAGMENT_CHARS
    characters (or all of a shorter `form`), each as long as it goes on matching."""
    head = form[: min(len(form), FRAGMENT_CHARS)]
    start = text.find(head)
    while start != -1:
        end = start + len(head)
        while end < len(text) and end - start < len(form) and text[end] == form[end - start]:
            end += 1
        yield start, end
        start = text.find(head, end)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every occurrence of each secret (see the module) replaced by `***`."""
    forms = {f for s in secrets if s and s.strip() for f in _forms(s)}
    return _mask(text, forms)


def _mask(text: str, forms: Iterable[str]) -> str:
    spans: list[tuple[int, int]] = []
    for form in forms:
        spans.extend(_spans(text, form))  # the key whole, or its start
        size = len(text)  # its end: the same search on the reversed strings
        spans.extend((size - b, size - a) for a, b in _spans(text[::-1], form[::-1]))
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for start, end in sorted(spans):
        if end <= pos:
            continue  # inside a span already masked
        if start > pos:
            out.append(text[pos:start])
            out.append(MASK)
        elif not out or out[-1] != MASK:
            out.append(MASK)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def register_secret(secret: str | None) -> None:
    """Mask `secret` in every client error message and client log line of this process."""
    global _known
    if not secret or not secret.strip():
        return
    with _lock:
        _known = tuple(sorted(set(_known) | _forms(secret)))


def redact_known(text: str) -> str:
    """`text` with every registered secret masked (see `register_secret`)."""
    known = _known  # one read: registering concurrently replaces the tuple, never changes it
    return _mask(text, known) if known else text
