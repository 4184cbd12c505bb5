"""API keys of server sections: read from an environment variable or a file, never stored."""

from __future__ import annotations

import os
from pathlib import Path

from qalign.clients.errors import CredentialsError


def _checked(value: str, source: str) -> str:
    key = value.strip()
    if not key:
        raise CredentialsError(f"{source} is empty")
    # A key goes into an HTTP header: a line break or control character inside it would be a
    # header injection (aiohttp refuses it with a ValueError deep in the request).
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise CredentialsError(
            f"{source} holds whitespace or a control character inside the key (several lines?); "
            "it must hold just the key"
        )
    return key


def api_key(env: str | None, file: str | None) -> str | None:
    """The key named by `api_key_env` or `api_key_file`; None when neither is given.

    Raises:
        CredentialsError: the variable is unset or empty, or the file cannot be read or does not
            hold one key.
    """
    if env:
        value = os.environ.get(env)
        if value is None or not value.strip():
            raise CredentialsError(
                f"api_key_env names ${env}, which is not set (or empty) in this process; "
                "export it where `qalign run` / `qalign worker` runs"
            )
        return _checked(value, f"${env}")
    if file:
        path = Path(file).expanduser()
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            )
            raise CredentialsError(f"cannot read api_key_file {str(path)!r}: {reason}") from None
        return _checked(value, f"api_key_file {str(path)!r}")
    return None
