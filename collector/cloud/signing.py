"""Request signing for EcoFlow's developer API (PROTOCOL.md "Signing").

The business parameters (query string, or JSON body) are flattened (nested objects with dots,
arrays with `[i]`), sorted by key in ASCII order, joined as `k=v` with `&`, followed by
`accessKey`, `nonce` and `timestamp`; the signature is the lowercase hex HMAC-SHA256 of that
string keyed by the secret key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any


def flatten(params: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Flattened `(key, value)` pairs of a nested JSON-like object, in no particular order."""
    pairs: list[tuple[str, str]] = []
    if isinstance(params, dict):
        for key, value in params.items():
            pairs += flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(params, list | tuple):
        for index, value in enumerate(params):
            pairs += flatten(value, f"{prefix}[{index}]")
    else:
        pairs.append((prefix, _text(params)))
    return pairs


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def business_string(params: dict[str, Any] | None) -> str:
    """The sorted `k=v&...` string of the business parameters ('' when there are none)."""
    pairs = sorted(flatten(params or {}), key=lambda kv: kv[0])
    return "&".join(f"{k}={v}" for k, v in pairs)


def signing_string(params: dict[str, Any] | None, access_key: str, nonce: str,
                   timestamp: str) -> str:
    auth = f"accessKey={access_key}&nonce={nonce}&timestamp={timestamp}"
    business = business_string(params)
    return f"{business}&{auth}" if business else auth


def sign(secret_key: str, text: str) -> str:
    return hmac.new(secret_key.encode(), text.encode(), hashlib.sha256).hexdigest()


def signed_headers(access_key: str, secret_key: str, params: dict[str, Any] | None = None,
                   nonce: str | None = None, timestamp: str | None = None) -> dict[str, str]:
    """The four authentication headers for one request."""
    nonce = nonce or str(secrets.randbelow(900_000) + 100_000)
    timestamp = timestamp or str(int(time.time() * 1000))
    text = signing_string(params, access_key, nonce, timestamp)
    return {"accessKey": access_key, "nonce": nonce, "timestamp": timestamp,
            "sign": sign(secret_key, text)}
