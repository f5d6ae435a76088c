"""No key, password or full token in a log line: a filter on the server's log handlers
that shortens our keys to their public prefix (the one `GET /admin/keys` shows), hides
the value of secret query parameters (`?api_key=`, browsers' WebSocket key) and the
password of a database URL, wherever they appear in a record."""

from __future__ import annotations

import logging
import re

# a key's secret part has 32 characters or more (core/keys.py MIN_SECRET_CHARS): 4 shown
_KEY = re.compile(r"\b(obb_(?:admin|client|node)_[A-Za-z0-9_-]{4})[A-Za-z0-9_-]{28,}")
_QUERY = re.compile(
    r"(?i)([?&;](?:api[_-]?key|key|token|access_token|password|secret)=)([^&\s\"']*)"
)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@")


def redact(text: str) -> str:
    """`text` with keys cut to their prefix and other secrets replaced by `***`."""
    text = _KEY.sub(r"\1***", text)
    text = _QUERY.sub(lambda m: m.group(1) + _shown(m.group(2)), text)
    return _URL_PASSWORD.sub(r"\1***@", text)


def _shown(value: str) -> str:
    return value if value.endswith("***") else "***"


class RedactSecrets(logging.Filter):
    """Rewrites each record's message and arguments with `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


LOGGERS = ("", "uvicorn", "uvicorn.access", "uvicorn.error")


def redact_logs() -> None:
    """Put `RedactSecrets` on every handler of the root and uvicorn loggers (call it
    once logging is configured); a handler that has one is left alone."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())
