"""Pick the decoder for a payload by its shape and topic, and run it: the one entry point."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from typing import Any

import orjson

from . import delta_gen1, delta_gen2, gen3, powerstream, protobuf, river_gen1, smartplug, stream
from .compiled import PLAN_CACHE_SIZE
from .json_envelopes import Unwrapped, unwrap
from .models import model_for, unknown_product_type
from .reading import DecodeError, Reading, epoch_ts

# A serial number: letters and digits. Placeholders ("<sn>", "${sn}") and masked ones ("****")
# in captured topics and payloads are not serial numbers.
_SN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{3,63}$")

# Where topics carry the serial number (PROTOCOL.md and DESIGN.md topic shapes).
_TOPIC_SN = (
    re.compile(r"^/app/device/property/([^/]+)$"),
    re.compile(r"^/app/[^/]+/([^/]+)/thing/property/[^/]+$"),
    re.compile(r"^/open/[^/]+/([^/]+)/[^/]+$"),
    re.compile(r"^bridge-ecoflow/([^/]+)/data$"),
)

_BASE64 = re.compile(rb"^[A-Za-z0-9+/]+={0,2}$")


def serial_number(candidate: Any) -> str | None:
    """`candidate` when it looks like a serial number, else None."""
    if isinstance(candidate, str) and _SN.match(candidate):
        return candidate
    return None


@functools.lru_cache(maxsize=4096)
def sn_from_topic(topic: str | None) -> str | None:
    """The serial number a topic names, or None."""
    # Cached: a collector sees the same few topics (one per station) over and over.
    for pattern in _TOPIC_SN:
        match = pattern.match(topic or "")
        if match:
            return serial_number(match.group(1))
    return None


def _source_from(topic: str | None, shape: str) -> str | None:
    if topic:
        if topic.startswith("/open/"):
            return "open_mqtt"
        if topic.startswith("/app/"):
            return "app_mqtt"
        if topic.startswith("bridge-ecoflow/"):
            return "bridge"
    if shape.startswith("rest"):
        return "rest"
    if shape.startswith("open"):
        return "open_mqtt"
    return None


# Every family prefix is one "<module>." segment, so "a key starts with the prefix" is "the
# key's first segment, dot included, is the prefix": one pass over the keys instead of five.
_GEN1_PREFIXES = frozenset(delta_gen1.PREFIXES)
_GEN2_PREFIXES = frozenset(delta_gen2.PREFIXES)
assert all(p.endswith(".") and p.count(".") == 1 for p in (
    powerstream.PREFIX, smartplug.PREFIX, *_GEN1_PREFIXES, *_GEN2_PREFIXES))


# The family by (key set, model): a station sends the same few key sets over and over.
_FAMILIES: dict[tuple, str | None] = {}


def _json_family(unwrapped: Unwrapped, model: str | None) -> str | None:
    key = (tuple(unwrapped.fields), model)
    family = _FAMILIES.get(key, _UNSEEN)
    if family is _UNSEEN:
        if len(_FAMILIES) >= PLAN_CACHE_SIZE:
            _FAMILIES.clear()
        family = _FAMILIES[key] = _family_of(unwrapped.fields.keys(), model)
    return family


_UNSEEN = object()


def _family_of(keys, model: str | None) -> str | None:
    heads = {k[:k.find(".") + 1] for k in keys}  # "" for a key without a dot
    if powerstream.PREFIX in heads:
        return powerstream.FAMILY
    if smartplug.PREFIX in heads:
        return smartplug.FAMILY
    if not stream.MARKER_KEYS.isdisjoint(keys):
        return stream.FAMILY
    if not gen3.MARKER_KEYS.isdisjoint(keys):
        return gen3.FAMILY
    if model in river_gen1.MODELS or not river_gen1.MARKER_KEYS.isdisjoint(keys):
        return river_gen1.FAMILY
    if (model in delta_gen1.MODELS or not _GEN1_PREFIXES.isdisjoint(heads)
            or not delta_gen1.MARKER_KEYS.isdisjoint(keys)):
        return delta_gen1.FAMILY
    if not _GEN2_PREFIXES.isdisjoint(heads):
        return delta_gen2.FAMILY
    return None


def _strip(fields: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in fields.items() if k.startswith(prefix)}


def decode_json(document: Any, topic: str | None = None, source: str | None = None) -> Reading:
    """One Reading from a parsed JSON document."""
    unwrapped = unwrap(document)
    device_sn = sn_from_topic(topic) or serial_number(unwrapped.sn)
    model = model_for(device_sn, unwrapped.product_type)
    family = _json_family(unwrapped, model)
    raw = document
    source = source or _source_from(topic, unwrapped.shape)
    ts = epoch_ts(unwrapped.timestamp)

    if unwrapped.online is False and not unwrapped.fields:
        return Reading(device_sn, ts, {}, raw, family or "offline", model, online=False,
                       source=source)
    if family is None or unknown_product_type(unwrapped.product_type) is not None:
        if family is None and unwrapped.shape == "rest_quota_all":
            raise DecodeError("JSON object carries no EcoFlow quota keys")
        # A product type we do not map: its keys may mean other things (units, packs) on that
        # model, so nothing is decoded from them; the payload is kept raw (unmapped_reason).
        # A well-formed EcoFlow message about a module we do not map (e.g. backend `addr` data).
        return Reading(device_sn, ts, {}, raw, "unmapped", model, online=unwrapped.online,
                       source=source)

    if family == powerstream.FAMILY:
        values, packs = powerstream.decode(_strip(unwrapped.fields, powerstream.PREFIX))
        model = model or "PowerStream"
    elif family == smartplug.FAMILY:
        values, packs = smartplug.decode(_strip(unwrapped.fields, smartplug.PREFIX))
        model = model or "Smart Plug"
    elif family == stream.FAMILY:
        values, packs = stream.decode(unwrapped.fields)
    elif family == gen3.FAMILY:
        values, packs = gen3.decode(unwrapped.fields)
    elif family == river_gen1.FAMILY:
        values, packs = river_gen1.decode(unwrapped.fields, model)
    elif family == delta_gen1.FAMILY:
        values, packs = delta_gen1.decode(unwrapped.fields, model)
    else:
        values, packs = delta_gen2.decode(unwrapped.fields, model)
    return Reading(device_sn, ts, values, raw, family, model, soc_modules=packs,
                   online=unwrapped.online, source=source)


def unmapped_product(reading: Reading) -> str:
    """The label an unmapped reading is counted under: "productType N", or "unknown module"."""
    raw = reading.raw if isinstance(reading.raw, dict) else {}
    data = raw.get("data")
    product_type = unknown_product_type(data.get("productType")) if isinstance(data, dict) \
        else None
    return "unknown module" if product_type is None else f"productType {product_type}"


def unmapped_reason(reading: Reading) -> str | None:
    """Why `reading` was stored raw without columns ("unmapped"), naming the product type or
    the modules it carries; None for a decoded reading."""
    if reading.family != "unmapped":
        return None
    product = unmapped_product(reading)
    if product != "unknown module":
        return f"{product} is not a model this collector decodes"
    raw = reading.raw if isinstance(reading.raw, dict) else {}
    params = raw.get("params") or raw.get("param") or {}
    module = raw.get("addr") or raw.get("typeCode")
    if module is None and isinstance(params, dict):
        module = ", ".join(sorted({str(k).split(".")[0] for k in params})[:5]) or None
    return f"no module this collector decodes ({module or 'no keys'})"


def _as_json(payload: bytes) -> tuple[Any, str | None]:
    """The JSON document in `payload` and its text, or (None, None) when the payload is not
    JSON text.

    orjson parses; Python's json module decides wherever the two could differ, so what a
    payload decodes to does not depend on the parser: a document orjson refuses (a lone
    surrogate escape, a number beyond a double) and one with a digit run long enough to hold
    an integer beyond 64 bits (which orjson would read as a float) go to `json`.
    """
    if payload.lstrip()[:1] not in (b"{", b"["):
        return None, None
    if _DIGITS_19 not in payload.translate(_DIGITS_ONLY):
        try:
            document = _orjson_loads(payload)
        except ValueError:  # orjson.JSONDecodeError
            pass
        else:
            return document, payload.decode("utf-8")
    try:
        text = payload.decode("utf-8")
        return _JSON.decode(text), text
    except (UnicodeDecodeError, ValueError):
        return None, None


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are not JSON (PostgreSQL's jsonb refuses them): undecodable. One decoder for
# every payload (json.loads with an option builds a new one per call).
_JSON = json.JSONDecoder(parse_constant=_no_constants)
_orjson_loads = orjson.loads
# An integer outside orjson's 64 bits has at least 19 digits: a payload with such a run of
# digits (each digit made "0", everything else a space) is parsed by json.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_DIGITS_19 = b"0" * 19


def _as_base64(payload: bytes) -> bytes | None:
    compact = b"".join(payload.split())
    if len(compact) < 4 or len(compact) % 4 or not _BASE64.match(compact):
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error:
        return None


def decode(payload: bytes, topic: str | None = None, source: str | None = None) -> list[Reading]:
    """Decode one payload (JSON, protobuf or base64-wrapped protobuf) into its readings.

    Raises DecodeError, whose message says why, for anything it cannot decode.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise DecodeError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if not payload.strip():
        raise DecodeError("empty payload")

    document, text = _as_json(payload)
    if document is not None:
        reading = decode_json(document, topic, source)
        reading.raw_json = text
        return [reading]
    if payload.lstrip()[:1] in (b"{", b"["):
        raise DecodeError("payload starts like JSON but is not valid UTF-8 JSON")

    transport = "binary"
    unwrapped = _as_base64(payload)
    if unwrapped is not None:
        payload, transport = unwrapped, "base64"
    topic_sn = sn_from_topic(topic)
    reading = protobuf.decode(payload, transport, model_for(topic_sn) if topic_sn else None)
    reading.device_sn = topic_sn or serial_number(reading.device_sn)
    reading.model = model_for(reading.device_sn)
    reading.source = source or _source_from(topic, "protobuf")
    return [reading]
