"""Logging set-up with redaction: secrets never reach a log line."""

from __future__ import annotations

import logging
import os
import re

# key=value, "key": "value" and URL passwords for keys that hold secrets.
_SECRET_KEYS = r"(?:password|passwd|pass|secret|secret_?key|access_?key|token|sign|sig|certificatePassword)"
_PATTERNS = [
    re.compile(rf"(?i)(\b{_SECRET_KEYS}\b\s*[=:]\s*[\"']?)([^\s\"'&,}}]+)"),
    re.compile(rf"(?i)(\"{_SECRET_KEYS}\"\s*:\s*\")([^\"]*)"),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)([^@\s]+)(@)"),
]
_registered_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it appears."""
    if value and len(value) >= 4:
        _registered_secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_registered_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern in _PATTERNS:
        if pattern.groups == 3:
            text = pattern.sub(r"\1***\3", text)
        else:
            text = pattern.sub(r"\1***", text)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup(level: str | None = None) -> None:
    """Configure the root logger once, level from LOG_LEVEL (default INFO)."""
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        from servicekit.settings import SettingsError

        raise SettingsError(
            f"LOG_LEVEL: {level!r} is not a level; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
