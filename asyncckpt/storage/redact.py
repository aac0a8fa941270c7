"""Credentials never leave the filesystem object: redacted from messages and log records."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["redact", "secrets_of", "install_log_redaction"]


_SECRET_KEYS = (
    "key",
    "secret",
    "token",
    "password",
    "session_token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "sas_token",
)


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options safe to show: every credential-like value is ``***``."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(s in k.lower() for s in _SECRET_KEYS):
            out[k] = "***"
        else:
            out[k] = v
    return out


_REDACTED: set[str] = set()


def install_log_redaction(secrets: list[str]) -> None:
    """Redact ``secrets`` from every log record of the process, whichever library logs it.

    botocore's DEBUG logging prints request headers (the access key id) and more; a filter on
    one logger would not reach its children, so the record factory is wrapped instead.  It
    costs one ``getMessage()`` per record, only once a secret has been registered.
    """
    new = [s for s in secrets if len(s) >= 4 and s not in _REDACTED]
    if not new:
        return
    first = not _REDACTED
    _REDACTED.update(new)
    if not first:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:
            return record
        if any(s in text for s in _REDACTED):
            for s in _REDACTED:
                text = text.replace(s, "***")
            record.msg, record.args = text, None
        return record

    logging.setLogRecordFactory(factory)


def secrets_of(options: dict[str, Any] | None) -> list[str]:
    found: list[str] = []
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            found += secrets_of(v)
        elif isinstance(v, str) and v and any(s in k.lower() for s in _SECRET_KEYS):
            found.append(v)
    return found
