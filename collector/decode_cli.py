"""`python -m collector decode [--topic T] FILE`: show what the collector would store for one payload.

FILE may be a JSON payload, a fixture file (`payload` / `payload_hex` / `payload_b64`; a
`payload_kind` naming "inner pdata" plus a `header` when only the inner message was captured),
or a binary payload given raw, as hex or as base64. Prints the reading(s) as JSON, or the
reason the payload cannot be decoded (exit 1).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from pathlib import Path
from typing import Any

from collector.decoders import DecodeError, decode
from collector.decoders.protobuf import header_message

_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})+$")


def payload_from_fixture(document: dict[str, Any]) -> tuple[bytes, str | None] | None:
    """The payload bytes and topic a fixture file describes, or None for a plain payload."""
    topic = document.get("topic") if isinstance(document.get("topic"), str) else None
    if "payload" in document:
        payload = document["payload"]
        # Some captures wrap EcoFlow's quota/all data map as {device_info, quota_all}.
        if isinstance(payload, dict) and isinstance(payload.get("quota_all"), dict):
            payload = payload["quota_all"]
        return json.dumps(payload).encode(), topic
    for key, convert in (("payload_hex", bytes.fromhex), ("payload_b64", base64.b64decode)):
        if isinstance(document.get(key), str):
            data = convert(document[key])
            inner_only = "inner pdata" in str(document.get("payload_kind", "")).lower()
            if inner_only and isinstance(document.get("header"), dict):
                # Inner pdata only: put it back into a header. Such captures are logged after
                # the XOR was undone, so the header must not ask for it again.
                header = {k: v for k, v in document["header"].items()
                          if k not in ("encType", "enc_type")}
                data = header_message(header, data)
            return data, topic
    return None


def load_payload(path: Path) -> tuple[bytes, str | None]:
    """Bytes to decode from FILE (and the topic a fixture file records)."""
    data = path.read_bytes()
    text = data.strip()
    try:
        document = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        document = None
    if isinstance(document, dict):
        fixture = payload_from_fixture(document)
        if fixture is not None:
            return fixture
        return data, None
    if _HEX.match(text.decode("ascii", errors="replace")):
        return bytes.fromhex(text.decode("ascii")), None
    # Base64 text and raw binary go to the decoder as they are: it recognises both.
    return data, None


def main(argv: list[str] | None = None) -> int:
    """Run the decode command; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m collector decode",
        description="Decode one captured EcoFlow payload and print the readings it yields.",
    )
    parser.add_argument("--topic", help="MQTT topic the payload arrived on (gives the serial)")
    parser.add_argument("--source", help="rest, open_mqtt, app_mqtt or bridge (default: guessed)")
    parser.add_argument("file", type=Path, help="payload file: JSON, fixture, raw, hex or base64")
    args = parser.parse_args(argv)

    try:
        payload, fixture_topic = load_payload(args.file)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except (ValueError, binascii.Error) as exc:
        print(json.dumps({"error": f"fixture payload is not valid hex/base64: {exc}"}))
        return 1
    try:
        readings = decode(payload, topic=args.topic or fixture_topic, source=args.source)
    except DecodeError as exc:
        print(json.dumps({"error": str(exc)}, indent=2))
        return 1
    print(json.dumps([reading.to_json() for reading in readings], indent=2, ensure_ascii=False))
    return 0
