"""Unwrap EcoFlow's JSON envelopes into one flat `<module>.<key>` map plus what the envelope says.

Shapes (PROTOCOL.md "Envelopes"): app MQTT pushes (`params` with prefixed keys), app
`latestQuotas` replies (`data.quotaMap`, `data.online`), open MQTT `typeCode` + bare `params`,
`cmdFunc`/`cmdId` + `param`, `cmdFunc`/`cmdId` + `addr` + `params`, the REST envelope
(`code`, `message`, `data`) and a bare REST `quota/all` data map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .reading import DecodeError

# Open MQTT typeCode -> the module prefix the same keys carry in quota/all.
TYPE_CODE_PREFIX = {
    "pdStatus": "pd.",
    "invStatus": "inv.",
    "mpptStatus": "mppt.",
    "bmsStatus": "bms_bmsStatus.",
    "emsStatus": "bms_emsStatus.",
    "kitInfo": "bms_kitInfo.",
}

# Legacy REST answers carry these pd. quantities with no prefix at all.
_LEGACY_BARE = ("soc", "remainTime", "wattsInSum", "wattsOutSum")


@dataclass(slots=True)
class Unwrapped:
    """A JSON payload reduced to its flat key map and envelope facts."""

    fields: dict[str, Any]
    shape: str
    sn: str | None = None
    timestamp: Any = None
    online: bool | None = None
    product_type: int | None = None


def _api_error(payload: dict[str, Any]) -> None:
    code = payload.get("code")
    if code is not None and str(code) not in ("0", "200"):
        message = payload.get("message") or payload.get("msg") or "no message"
        raise DecodeError(f"EcoFlow answered with error code {code}: {message}")


def _online(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value in (0, 1, "0", "1"):
        return str(value) == "1"
    return None


def _prefixed(params: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in params.items()}


# An app push is `params` beside keys that name no other shape: what most traffic is, so it is
# recognised first (the checks below would reach the same app_params result after five).
_NOT_APP_PUSH = frozenset({"code", "data", "typeCode", "param", "addr"})


def unwrap(payload: Any) -> Unwrapped:
    """The flat key map of a decoded JSON document, or DecodeError naming what is missing."""
    if type(payload) is dict:
        params = payload.get("params")
        if type(params) is dict and _NOT_APP_PUSH.isdisjoint(payload):
            return Unwrapped(dict(params), "app_params", None, payload.get("timestamp"))
    elif not isinstance(payload, dict):
        raise DecodeError(f"JSON payload is a {type(payload).__name__}, not an object")
    _api_error(payload)
    data = payload.get("data")
    params = payload.get("params")
    param = payload.get("param")

    if isinstance(data, dict) and ("quotaMap" in data or "online" in data):
        quota_map = data.get("quotaMap")
        return Unwrapped(
            fields=quota_map if isinstance(quota_map, dict) else {},
            shape="latest_quotas",
            sn=data.get("sn"),
            timestamp=payload.get("timestamp"),
            online=_online(data.get("online")),
            product_type=data.get("productType"),
        )
    if isinstance(params, dict) and isinstance(payload.get("typeCode"), str):
        type_code = payload["typeCode"]
        prefix = TYPE_CODE_PREFIX.get(type_code, f"{type_code}.")
        return Unwrapped(_prefixed(params, prefix), "open_type_code", timestamp=payload.get("time"))
    if isinstance(param, dict) and "cmdFunc" in payload and "cmdId" in payload:
        prefix = f"{payload['cmdFunc']}_{payload['cmdId']}."
        return Unwrapped(_prefixed(param, prefix), "open_cmd_param")
    if isinstance(params, dict):
        addr = payload.get("addr")
        if isinstance(addr, str) and addr and not any("." in key for key in params):
            return Unwrapped(_prefixed(params, f"{addr}."), "open_cmd_addr")
        return Unwrapped(dict(params), "app_params", timestamp=payload.get("timestamp"))
    if isinstance(data, dict):
        return _flat(data, "rest_envelope")
    if "code" in payload or "message" in payload:
        raise DecodeError("EcoFlow reply without data: nothing to decode")
    if payload and all(isinstance(key, str) for key in payload):
        return _flat(payload, "rest_quota_all")
    raise DecodeError("JSON object has no EcoFlow envelope (params, param, data or quota keys)")


def _flat(data: dict[str, Any], shape: str) -> Unwrapped:
    if not data:
        raise DecodeError("empty quota map: nothing to decode")
    fields = dict(data)
    for key in _LEGACY_BARE:
        if key in fields and f"pd.{key}" not in fields:
            fields[f"pd.{key}"] = fields.pop(key)
    return Unwrapped(fields, shape)
